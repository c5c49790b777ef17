"""The daemon's data plane: the serving runtime (the deployer's Activator) and the HTTP API in front
of it, built from the config and started and stopped together."""

from __future__ import annotations

import logging

from edge.api.app import create_app
from edge.api.generation import Serving
from edge.api.server import ApiServerThread, bind_sockets
from edge.config import EdgeConfig
from edge.delivery.store import ContentStore
from edge.metrics import Metrics
from edge.runtime.router import ModelRouter
from edge.runtime.serving import ServingRuntime

log = logging.getLogger(__name__)


class DataPlane:
    """Models in worker processes, served to Slips over TCP and/or a Unix socket."""

    def __init__(self, config: EdgeConfig) -> None:
        api = config.api
        self.metrics = Metrics()
        self.router = ModelRouter(max_waiting=api.queue)
        self.runtime = ServingRuntime(
            self.router,
            ContentStore(config.store_dir),
            config.runtime,
            api,
            config.device.procfs_root,
            self.metrics,
        )
        serving = Serving(
            self.router,
            self.metrics,
            api.request_timeout_s,
            frozenset(api.low_priority_models),
            config.thermal.defer_retry_after_s,
        )
        app = create_app(serving, api.max_body_bytes, api.bearer_token())
        self._server = ApiServerThread(app, bind_sockets(api))

    def start(self) -> None:
        self.runtime.start()
        self._server.start()

    def close(self) -> None:
        self._server.stop()
        self.runtime.close()
