"""Independent reference implementations of gradient filtering (Yang et al., CVPR 2023).

`gradient_filter_numpy` is the float64 numpy transcription of the equations that the
compiler's rewrite pass is tested against; `gradient_filter_torch` is the same math as
an eager-mode `torch.autograd.Function`, used as a benchmark baseline.

Nothing is imported here eagerly so that the numpy reference stays usable without
importing torch.
"""
