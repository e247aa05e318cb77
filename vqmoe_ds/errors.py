"""The one error type for a bad setting -- a flag, a config file's key or value, a ds_config field, a config
dataclass's field -- wherever it is found: `ConfigError`, whose message is one line naming the setting and the fix.
(Bad data and bad checkpoints have their own types: ``vqmoe_ds.data.DataError``, ``vqmoe_ds.checkpoint.CheckpointError``.)
"""


class ConfigError(ValueError):
    """A bad setting; the message is one line naming the setting and the fix."""
