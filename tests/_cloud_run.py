"""A started in-process :class:`server.cloud.CloudServer` with a connected stub, for the cloud's
loopback tests (``test_cloud_server``, ``test_cloud_restart``); stops gracefully on exit."""

from __future__ import annotations

import grpc

from core.export import Preprocess
from protos.codec import GRPC_OPTIONS
from protos.fedshift.v1 import edge_pb2_grpc as pb_grpc
from server.cloud import CloudConfig, CloudServer


class RunningCloud:
    """``with RunningCloud((student, teacher), config) as run:`` -- ``run.server``, ``run.stub``."""

    def __init__(self, models, config: CloudConfig) -> None:
        self.server = CloudServer(models[0], models[1], config, preprocess=Preprocess())

    def __enter__(self):
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}", options=GRPC_OPTIONS)
        self.stub = pb_grpc.EdgeServiceStub(self.channel)
        return self

    def __exit__(self, *exc) -> None:
        self.channel.close()
        self.server.stop(grace=0.5)
