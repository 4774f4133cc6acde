"""The RL trainer (top of the import graph; nothing in the package imports it).

``python -m megatron_alp.train [Megatron arguments] [ALP / RL arguments]`` — see
``docs/train.md``. Modules: ``arguments`` (Megatron's parser + ours), ``policy`` (build,
load, DDP, optimizer, passes), ``rollouts`` / ``batches`` (samples and their layout),
``loop`` (one RL step, eval, exits), ``checkpoint`` (atomic Megatron-layout checkpoints),
``logging`` (progress, metrics.jsonl, wandb / TensorBoard, summary).
"""
