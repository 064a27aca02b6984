"""Checking `xpcnn/ops/fast_cupy.py` without a GPU: its CUDA kernels compiled by NVRTC
(`cupy_internals`) and run on the CPU through a C++ emulation (`emulator`); see
docs/cuda-emulation.md."""
