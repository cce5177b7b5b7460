"""Triton kernels for dlfast, installed as the subpackage dlfast.triton_kernels."""
