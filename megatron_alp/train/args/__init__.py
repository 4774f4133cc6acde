"""The trainer's argument groups, one module per group: its flags and, next to them, their checks.

``run`` (model, data, reward, engine, evaluation, run folder), ``objective`` (``--rl-loss``
and ``--rl-loss-*``), ``alp`` (``--alp-*``), ``fleet`` (``--rl-fleet-*``), ``multiturn``
(``--rl-max-turns``, ``--rl-sandbox*``), ``megatron`` (the Megatron flags the trainer reads,
with their meaning here, and their checks), ``config_file`` (``--config FILE.yaml``) and
``parser`` (the parser itself: one-line errors, ``--help`` / ``--help-all``).
:func:`megatron_alp.train.arguments.parse_args` calls them in order.
"""
