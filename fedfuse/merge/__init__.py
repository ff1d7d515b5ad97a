"""Merging models trained apart (sites' checkpoints, clients with their own inits).

Alignment beyond permutations (CCA Merge, ZipIt!-style zipping), server-side ensemble distillation (FedDF),
and the orchestration behind ``fedfuse merge`` (load N parents, fuse with each method, evaluate against the
parents, their average and their logit ensemble). Pure PyTorch + POT + scipy, like the rest of the core.
"""
