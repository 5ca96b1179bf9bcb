"""Every optimiser Ultralytics builds keeps a consistent state across a shift, in a real training run.

The shift's map M = U diag(λ/(λ+μ)) Uᵀ is rebuilt here in numpy from the Gram the trainer solved on (its top `rank`
eigenpairs and the logged μ), checked against the weights (V' = MV), and then every first-moment state tensor must be
M·buffer and every second moment bit-identical.
"""

import numpy as np
import pytest
import torch
from conftest import tiny_train
from ultralytics.models.yolo.detect import DetectionTrainer

from sos_detect.core.apply import OPTIMIZER_STATE
from sos_detect.core.capture import as_v
from sos_detect.detect import SOSDetectionTrainer, SOSTrainerMixin

pytestmark = pytest.mark.slow  # every test starts a real training

SEEN: dict[str, dict] = {}


class Recorder(SOSDetectionTrainer):
    def sos_shift(self, epoch, capture=None):
        layers = self._shifted_layers(self.model)
        state = self.optimizer.state

        def tensors():
            return {
                n: {"V": as_v(m.weight.detach()).double().clone()}
                | {k: as_v(v).double().clone() for k, v in state[m.weight].items() if torch.is_tensor(v) and v.ndim}
                for n, m in layers.items()
            }

        before, grams = tensors(), {n: acc.gram.clone() for n, acc in capture.grams().items()}
        reports = super().sos_shift(epoch, capture)
        SEEN[self.args.optimizer] = {
            "before": before, "after": tensors(), "grams": grams, "report": reports["model"],
            "type": type(self.optimizer).__name__,
        }  # fmt: skip
        return reports


def shift_map(gram: torch.Tensor, rank: int, mu: float) -> np.ndarray:
    lam, u = np.linalg.eigh(gram.numpy())
    lam, u = lam[::-1][:rank].clip(0), u[:, ::-1][:, :rank]
    return (u * (lam / (lam + mu))) @ u.T


@pytest.mark.parametrize("optimizer", ["SGD", "MuSGD", "Adam", "AdamW", "NAdam", "RAdam", "Adamax", "RMSprop"])
def test_shift_maps_every_first_moment_and_keeps_second_moments(optimizer, tmp_path):
    tiny_train(tmp_path, "o", trainer=Recorder, optimizer=optimizer, lr0=1e-3, epochs=1, imgsz=64, sos_start=0,
               sos_images=16, sos_ema="follow", sos_tau=1e-3)  # fmt: skip
    seen = SEEN[optimizer]
    firsts, seconds = OPTIMIZER_STATE[seen["type"]]
    keys = set(next(iter(seen["before"].values()))) - {"V"}
    assert keys and keys <= set(firsts) | set(seconds)  # every weight-shaped state tensor is named in the table
    assert set(firsts) - {"grad_avg"} <= keys  # every first moment is there (RMSprop's grad_avg only when centred)
    assert seen["report"].applied
    for layer in seen["report"].layers:
        m = shift_map(seen["grams"][layer.name], layer.rank, layer.mu)
        before, after = seen["before"][layer.name], seen["after"][layer.name]
        scale = float(before["V"].abs().max())
        np.testing.assert_allclose(after["V"].numpy(), m @ before["V"].numpy(), rtol=0, atol=2e-6 * scale)
        for key in keys:
            if key in firsts:
                expected = m @ before[key].numpy()
                scale = max(float(before[key].abs().max()), 1e-30)
                np.testing.assert_allclose(after[key].numpy(), expected, rtol=0, atol=2e-5 * scale)
                moved = float((after[key] - before[key]).abs().max())
                assert moved > 0 or float(before[key].abs().max()) == 0  # it really was mapped
            else:
                assert torch.equal(after[key], before[key])


class Lion(torch.optim.SGD):
    """An optimiser class the table does not name (its state layout is unknown to SOS)."""


class LionTrainer(DetectionTrainer):
    def build_optimizer(self, model, *args, **kwargs):
        return Lion(model.parameters(), lr=0.01, momentum=0.9)


class SOSLionTrainer(SOSTrainerMixin, LionTrainer):
    """The mixin on a user's own trainer."""


def test_an_optimiser_the_table_does_not_know_is_refused_at_the_start(tmp_path):
    with pytest.raises(TypeError, match="optimizer Lion: SOS does not know which of its state tensors"):
        tiny_train(tmp_path, "u", trainer=SOSLionTrainer, epochs=1, imgsz=64)
    assert not (tmp_path / "u" / "results.csv").exists()  # refused before the first epoch
