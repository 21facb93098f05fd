"""A toy reproduction of the paper's two claims (GGPO vs GSPO; graph vs linear and summary
memory) on a small memory-graph MDP, in pure JAX: ``python -m vimrag_jax.toy --seeds=32``.

``env`` holds the MDP, ``memories`` the three memories' encodings and the policy, ``train``
the rollouts and updates (``make_train(config)`` → a pure ``train(key, setting)``), ``report``
the figures. See ``docs/toy.md``.
"""
