"""One federated client round as a device runs it, for tests/test_federated.py.

Flower's ClientApp gets a train (or evaluate) message holding the server's parameters and replies
with the trained ones. The same file is imported by the tests and run as a script in a Python 3.13
venv with plain onnxruntime, so both drive the client identically; the backend is whichever
`Trainer` picks where it runs. Imports only the runtime, numpy and flwr (no torch, no gfcompile).

    python federated_round.py ARTIFACTS TRAIN.npz SERVER.npz OUT.npz LR ROUND_CONFIG_JSON
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

from runtime.federated import ClientConfig, build_client_app, from_record, to_record
from runtime.trainer import Trainer


def client_round(
    config: ClientConfig, arrays: dict[str, np.ndarray], round_config: dict, kind: str = "train"
) -> tuple[dict[str, np.ndarray], dict]:
    """The parameters (train) and metrics partition 0 of 2 replies with."""
    app = build_client_app(config)
    content = {"arrays": to_record(arrays), "config": ConfigRecord(round_config)}
    # The metadata a SuperLink would deliver the server's message with (node 0 to node 1).
    delivered = Metadata(
        run_id=1,
        message_id=f"{kind}-1",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=kind,
    )
    message = Message(RecordDict(content), metadata=delivered)
    node = {"partition-id": 0, "num-partitions": 2}
    reply = app(message, Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={}))
    if reply.has_error():
        raise RuntimeError(reply.error.reason)
    returned = from_record(reply.content["arrays"]) if "arrays" in reply.content else {}
    return returned, dict(reply.content["metrics"])


if __name__ == "__main__":
    artifacts, train, server, out, lr, round_config = sys.argv[1:7]
    config = ClientConfig(artifacts=artifacts, train_data=train, lr=float(lr))
    arrays, metrics = client_round(config, dict(np.load(server)), json.loads(round_config))
    np.savez(out, **arrays)
    import onnxruntime

    where = {"python": list(sys.version_info[:2]), "onnxruntime": onnxruntime.__version__}
    print(json.dumps({"backend": type(Trainer(artifacts)).__name__, **where, **metrics}))
