"""The Flower components of the federated app: both read their settings from the run config."""

from gfcompile.federate import build_server_app
from runtime.federated import build_client_app

server_app = build_server_app()
client_app = build_client_app()
