"""Ahead-of-time compiles of the train step and the pair sampler for accelerators that are
not attached (TPU topologies through libtpu), with the compiler's memory and cost reports.
See benchmarks/train_compile.py and docs/performance.md."""
