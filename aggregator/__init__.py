"""The aggregator of multi-client training: a group's rounds, and the average of its members' first parts.

It runs apart from the server (`split-aggregator`), so the model owner never sees first-part weights, or inside
the server (`split-server --aggregator`). It needs no TensorFlow. See docs/multi_client.md.
"""
