"""The DeepFocus daemon: ZeroMQ wire protocol, server and inference worker.

Start one with ``deepfocus serve --bind tcp://127.0.0.1:5555`` (or
``python -m deepfocus.service serve``); talk to it with ``deepfocus.client``.
"""
from .protocol import PROTOCOL_VERSION, Limits, ProtocolError
from .server import (DEFAULT_ADDRESS, CurveServerKeys, Server, ServerConfig, ServiceConfigError,
                     configure_json_logging, is_loopback)
from .worker import ModelError, ModelRegistry

__all__ = ["PROTOCOL_VERSION", "Limits", "ProtocolError", "DEFAULT_ADDRESS", "CurveServerKeys",
           "Server", "ServerConfig", "ServiceConfigError", "configure_json_logging",
           "is_loopback", "ModelError", "ModelRegistry"]
