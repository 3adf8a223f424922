"""The names of the continuation rule's stop-feature sets, known to the config without torch.

The features themselves are computed in :mod:`policycascade.agents.stop_features`; the
config validates ``continuation.feature_set`` against these names without importing it.
"""

FEATURE_SETS = ("max-softmax", "confidence", "history", "class")
