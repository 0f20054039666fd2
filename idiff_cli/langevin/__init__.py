"""Langevin processes optimised through sampling (paper §2.2, §5.1 and Appendix A.1).

Array convention: a batch of points in R^d is an array x of shape [d, B] (coordinates first), so
that every per-point formula, written with x[0], x[1], ..., broadcasts over the particle axis and
XLA vectorises over the long contiguous axis. One point is the special case x of shape [d].
"""
