"""DeepFocus: CNN autofocus and autostigmation, DeepScore recalibration, and the ZeroMQ daemon."""
