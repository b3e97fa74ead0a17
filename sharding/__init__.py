"""Mapping of the model's logical axes onto device meshes. The model imports only `sharding.axes`."""
