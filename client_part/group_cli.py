"""`split-client --group`: train as one member of a group (client_part/group.py), print its rounds."""

from __future__ import annotations

import json
import logging
import sys
from typing import TYPE_CHECKING, Any

from client_part.aggregator_link import AggregatorLink
from client_part.group import Data, GroupMember, RoundRecord, table
from client_part.retry import RetryPolicy
from splitlearning import security
from splitlearning.groups import Scheme, Settings

if TYPE_CHECKING:
    from client_part.cli import ClientConfig
    from client_part.client import SplitClient

log = logging.getLogger("split-client")


def run_member(
    config: ClientConfig,
    client: SplitClient,
    train: tuple[Any, Any],
    validation: tuple[Any, Any] | None,
    test: tuple[Any, Any],
) -> dict[str, float]:
    assert config.group is not None and config.member is not None
    settings = Settings(Scheme(config.scheme), config.rounds, config.local_epochs)
    link = AggregatorLink(
        config.aggregator or config.target,
        config.group,
        config.member,
        settings,
        tls=security.client_tls(
            config.tls_cert, config.tls_key, config.tls_ca, config.tls_server_name, enabled=config.tls
        ),
        auth_token=security.read_token(config.auth_token_file) if config.auth_token_file else None,
        rpc_timeout=config.rpc_timeout,
        policy=RetryPolicy(timeout=max(config.retry_timeout, config.connect_timeout)),
        stop=client._stop.is_set,
    )
    rounds_log = _RoundLog(config) if config.log_dir else None
    member = GroupMember(
        client, link, config.handover_dir, on_round=rounds_log.round if rounds_log is not None else None
    )
    log.info("member %d of group %s (%s), aggregator at %s", config.member, config.group, settings, link.target)
    data = Data(
        train[0],
        train[1],
        config.batch_size,
        not config.no_shuffle,
        config.seed,
        validation,
        test,
        verbose=1 if sys.stdout.isatty() else 0,
    )
    try:  # no `with client`: its connect would open a session outside the group
        result = member.train(data)
        if rounds_log is not None:
            rounds_log.final(result.final_round, result.final_test)
        if config.save_weights:
            from splitlearning.checkpoint import save_weights

            save_weights(config.save_weights, client.model, client.trainer.optimizer)
    finally:
        client.close()
        link.close()
        if rounds_log is not None:
            rounds_log.close()
    print(f"\nmember {result.member} of group {result.group}: {len(result.rounds)} rounds trained ({result.scheme})")
    print(table(result))
    print("test (the group's model) " + ", ".join(f"{name}: {value:.4f}" for name, value in result.final_test.items()))
    if config.history_json:
        config.history_json.write_text(json.dumps(result.to_json(), indent=2))
    return result.final_test


class _RoundLog:
    """TensorBoard scalars per round under `--log-dir/client/<group>-member-<k>`: `round/start_test_*` (the
    group's model as the round starts), `round/local_test_*`, `round/train_*`, `round/seconds`; step = round."""

    def __init__(self, config: ClientConfig) -> None:
        from splitlearning.events import ScalarWriter

        assert config.log_dir is not None
        self.writer = ScalarWriter(config.log_dir / "client" / f"{config.group}-member-{config.member}")

    def round(self, record: RoundRecord) -> None:
        values = {f"round/start_test_{k}": v for k, v in record.start_test.items()}
        values.update({f"round/local_test_{k}": v for k, v in record.local_test.items()})
        values.update({f"round/train_{k}": v for k, v in record.logs.items()})
        values["round/seconds"] = record.seconds
        values["round/samples"] = float(record.samples)
        self.writer.scalars(record.round, values)
        self.writer.flush()

    def final(self, round_: int, test: dict[str, float]) -> None:
        self.writer.scalars(round_, {f"round/start_test_{k}": v for k, v in test.items()})

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
