"""The ground floor every domain package stands on; it imports nothing of sos_detect above it.

solver (the minimum-norm shift and its Gram), capture (layers as Z = AV, Gram hooks), apply (solve, write or roll
back, DDP, `shift_targets`), record (one shift's report and the shift log), options (the sos_* table, `ShiftConfig`),
runs (finished-run guards, atomic writes), stats (paired differences), checkpoints, images, fashion_mnist, hessian,
optim (SAM, NSO), runtime (threads, offline).
"""
