"""The serving layer every gRPC service of this project shares: the edge (errors to statuses), admission, the
bearer-token check, health checking, the Prometheus endpoint, and one builder of a gRPC server (`host`).

It knows no role: the model server (server_part) and the aggregator (aggregator) are built on it, and neither
imports the other (docs/design.md, "Layers")."""
