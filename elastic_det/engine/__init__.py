"""The training engine: the trainer that wires config -> build -> restore -> run, the ``Runner`` with its
hook API, the training state, AMP, the process group and the preemption flag."""
