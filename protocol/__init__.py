"""Wire protocol shared by every mmserve role: msgspec messages, tensor frames, zmq sockets.

Nothing here imports torch at module level, so the frontend stays light.
"""
