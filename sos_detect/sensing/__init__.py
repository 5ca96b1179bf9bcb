"""Matrix sensing with a deep linear factorisation: a testbed where loss, test error, Hessian and nuclear norm
are all exact.

problem.py      ground truth X*, Gaussian measurements, the factorisation X = W_L ⋯ W_1 and its loss
shifting.py     exact optimum shifting of W_L (the project's solver on the measurement rows vec(A_i Pᵀ))
trainers.py     GD, GD + weight noise, NSO, SAM (sos_detect.core.optim), GD + optimum shifting every k steps
diagnostics.py  training loss, test error, full-Hessian trace and top eigenvalue, ‖X‖_*, ‖W_L‖_F
compare.py      `sos-detect reproduce sensing`: every method over seeds, paired against GD; table and plots
"""
