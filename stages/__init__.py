"""clickdog: one module per DVC stage; shared code lives in ``stages.lib``."""
