"""The image and the compose files on a real container engine: build the image from this checkout once, then

- docker-compose.yml: run the pair, check what a user would, bring it down and up again (it must resume finished,
  not retrain), then remove it;
- docker-compose.multi.yml, on the same image: a server, an aggregator and three members train one model; every
  member ends well and reports the same group model, every round closed with all three, then remove it;
- docker-compose.vertical.yml, on the same image: the data service writes the party files, a label party and two
  feature parties align and train; every container exits 0 and the label party reports its held-out metrics,
  then remove it.

Needs the engine scripts/docker_engine.sh starts (.ci/run runs the tests under it)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from splitlearning import vertical_data
from tests.deploy_compose import MULTI_COMPOSE_FILE, VERTICAL_COMPOSE_FILE, resolved, services
from tests.engine_support import COMPOSE_TIMEOUT, Engine, build_image, engine, volume_files, volume_path
from tests.faults_support import free_port

pytestmark = pytest.mark.processes  # every test here starts OS processes

MIN_ACCURACY = 0.9  # the demo (digits-mlp, 10 epochs) reaches about 0.96; chance is 0.1
# docker-compose.multi.yml's IID group (digits-mlp, 5 rounds of 2 local epochs on thirds of the digits) reaches
# about 0.94; chance is 0.1.
MIN_GROUP_ACCURACY = 0.85
FINISHED_STEP = re.compile(r"trained \d+ epochs, (\d+) steps")
TEST_ACCURACY = re.compile(r"^client_1 +\| test loss: [0-9.]+, accuracy: ([0-9.]+)$", re.MULTILINE)
GROUP_TEST = re.compile(r"^test \(the group's model\) loss: ([0-9.]+), accuracy: ([0-9.]+)$", re.MULTILINE)
# A member's row per round: round | samples | seconds | train loss | start test accuracy | local test accuracy
ROUND_ROW = re.compile(r"^ *(\d+) \| +(\d+) \| +[0-9.]+ \| +[0-9.na]+ \| +([0-9.]+) \| +([0-9.]+)$", re.MULTILINE)
MEMBERS = ("member-1", "member-2", "member-3")
# docker-compose.vertical.yml (the digits' halves, 5 epochs) reaches about 0.93 on its held-out rows; chance is 0.1.
MIN_VERTICAL_ACCURACY = 0.8
VERTICAL_SERVICES = ("data", "label-party", "left", "right")
EPOCH_LINE = re.compile(
    r"split-label-party: epoch (\d+)/(\d+) \(step (\d+)\): loss [0-9.]+ .*test_accuracy ([0-9.]+)\b", re.M
)
ALIGNED_LINE = re.compile(r"^aligned rows (\d+) \(train (\d+), held out (\d+)\); steps (\d+)$", re.MULTILINE)
FINAL_LINE = re.compile(r"^final: loss [0-9.]+ .*test_loss ([0-9.]+)  test_accuracy ([0-9.]+)$", re.MULTILINE)
AGGREGATOR_SERVICE = "splitlearning.v1.AggregatorService"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class Image:
    engine: Engine
    tag: str
    build_seconds: float


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    """The image, built once with BuildKit (the proxy's CA as a secret) for every test here; removed after."""
    found = engine()
    tag = f"splitlearning:ci-{os.getpid()}"
    try:
        build = build_image(found, tag)
        assert build.returncode == 0, f"docker build failed:\n{build.output[-6000:]}"
        assert "SYS_UID_MAX" not in build.output, "useradd warns about the image's user"
        yield Image(found, tag, build.seconds)
    finally:
        found.run("image", "rm", "--force", tag, check=False)


def service_events(events: list[dict[str, Any]], service: str, action: str) -> list[int]:
    """When (ns) a compose service's container did `action` ('start', 'health_status: healthy', ...)."""
    return [
        int(event["timeNano"])
        for event in events
        if event.get("Action") == action and event["Actor"]["Attributes"].get("com.docker.compose.service") == service
    ]


def container_name(engine: Engine, project: str, service: str) -> str:
    (found,) = [
        name
        for name in engine.run("ps", "--all", "--format", "{{.Names}}").split()
        if name == f"{project}_{service}_1" or name == f"{project}-{service}-1"  # compose v1 / v2 names
    ]
    return found


def container(engine: Engine, project: str, service: str) -> dict[str, Any]:
    return engine.inspect("container", container_name(engine, project, service))


def test_compose_trains_resumes_finished_and_cleans_up(image: Image) -> None:
    found = image.engine
    project = f"splitci{os.getpid()}"
    extra = {"SPLIT_IMAGE": image.tag, "SPLIT_PORT": str(free_port())}  # the engine publishes the server's port there
    timings: dict[str, float] = {"build": image.build_seconds}
    try:
        # compose's `--build` finds every layer of the image in the cache.
        since = time.time()
        first = found.compose(project, "up", "--build", "--exit-code-from", "client", extra=extra)
        until = time.time()
        output = ANSI.sub("", first.output)
        timings["up"] = first.seconds
        assert first.returncode == 0, f"the client failed:\n{output[-6000:]}"
        assert output.count("Building server") == 1 and "Building client" not in output, "one build, shared"

        # The server was healthy before the client started.
        events = found.events(since, until + 1)
        healthy = service_events(events, "server", "health_status: healthy")
        started = service_events(events, "client", "start")
        assert healthy and started, f"no health or start events: {events}"
        assert min(healthy) < min(started), "the client started before the server was healthy"

        # The server runs as the image's non-root user.
        server = container(found, project, "server")
        assert server["Config"]["User"] == "split:split", server["Config"]["User"]
        uid = found.run("run", "--rm", "--entrypoint", "id", image.tag, "-u").strip()
        assert uid == "10001", uid

        # The client printed its test accuracy, above the demo's bar, and both sides checkpointed its last step.
        (accuracy,) = TEST_ACCURACY.findall(output)
        assert float(accuracy) >= MIN_ACCURACY, output[-3000:]
        (steps,) = FINISHED_STEP.findall(output)
        server_files = volume_files(found, f"{project}_server-state")
        client_files = volume_files(found, f"{project}_client-state")
        assert any(path.name == f"ckpt-{steps}.index" for path in server_files), server_files
        assert any(path.name == f"ckpt-{steps}.index" for path in client_files), client_files

        # Down (the volumes stay) and up again: the finished pair resumes at its last step and trains nothing.
        down = found.compose(project, "down", extra=extra)
        assert down.returncode == 0, down.output
        again = found.compose(project, "up", "--exit-code-from", "client", extra=extra)
        output = ANSI.sub("", again.output)
        timings["up again"] = again.seconds
        assert again.returncode == 0, f"the client failed on resuming:\n{output[-6000:]}"
        assert f"restored this client's checkpoint of step {steps}" in output, output[-3000:]
        assert re.search(rf"resumed session \w+ at step {steps}\b", output), output[-3000:]
        assert "Epoch 1/" not in output and "saved checkpoint" not in output, f"it trained again:\n{output}"
        assert "nothing left to train" in output, output[-3000:]
        assert "forgot checkpoints" not in output, f"the server rolled back:\n{output}"
        assert "update_checkpoint_state" not in output, output
        assert TEST_ACCURACY.findall(output) == [accuracy], "the same model, evaluated again"
    finally:
        gone = found.compose(project, "down", "--volumes", extra=extra)
        print(f"\nengine timings (s): {timings}")
    assert gone.returncode == 0, gone.output
    volumes = found.run("volume", "ls", "--quiet").split()
    assert not [volume for volume in volumes if volume.startswith(project)], volumes


def test_multi_compose_three_members_train_one_model(image: Image) -> None:
    """docker-compose.multi.yml as its header's scripted form runs it: `up --detach`, `docker wait` for the three
    members, their logs, `down --volumes`. Without `--build`: it runs the image built above, which is the one the
    file builds (tests/test_deploy_compose.py), so CI builds once."""
    found = image.engine
    project = f"splitmulti{os.getpid()}"
    files = ("--file", str(MULTI_COMPOSE_FILE))
    extra = {"SPLIT_IMAGE": image.tag}
    config = services(resolved(MULTI_COMPOSE_FILE))
    rounds, group = int(config["member-1"].environment["SPLIT_ROUNDS"]), config["member-1"].environment["SPLIT_GROUP"]
    aggregator_address = config["aggregator"].environment["SPLIT_ADDRESS"].replace("0.0.0.0", "127.0.0.1")
    timings: dict[str, float] = {}
    logs: dict[str, str] = {}

    def collect(names: dict[str, str]) -> str:
        """Every container's log (kept in `logs`), the tail of each for a failure's message."""
        for service, name in names.items():
            logs[service] = ANSI.sub("", found.call("logs", name).output)
        return "\n".join(f"--- {service}:\n{text[-2500:]}" for service, text in logs.items())

    try:
        since = time.time()
        up = found.compose(project, *files, "up", "--detach", extra=extra)
        assert up.returncode == 0, f"up failed:\n{up.output[-6000:]}"
        timings["up"] = up.seconds
        names = {service: container_name(found, project, service) for service in ("server", "aggregator", *MEMBERS)}
        started = time.monotonic()
        try:
            waited = found.call("wait", *(names[member] for member in MEMBERS), timeout=COMPOSE_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the members did not finish in {COMPOSE_TIMEOUT:g} s:\n{collect(names)}")
        until = time.time()
        timings["members"] = time.monotonic() - started
        report = collect(names)
        assert waited.returncode == 0 and waited.output.split() == ["0"] * len(MEMBERS), (
            f"member exit statuses {waited.output.split()}:\n{report}"
        )

        # The members started once the server and the aggregator were healthy.
        events = found.events(since, until + 1)
        for service in ("server", "aggregator"):
            healthy = service_events(events, service, "health_status: healthy")
            assert healthy, f"{service} never healthy: {events}"
            for member in MEMBERS:
                (member_start,) = service_events(events, member, "start")
                assert min(healthy) < member_start, f"{member} started before {service} was healthy"

        # Every container runs as the image's non-root user.
        for service in names:
            user = container(found, project, service)["Config"]["User"]
            assert user == "split:split", f"{service}: {user}"

        # Each member printed its rounds (its local model's test accuracy each round) and the group's model on the
        # test split; all three evaluated the same averaged model, so they report the same.
        finals = {}
        for k, member in enumerate(MEMBERS, start=1):
            log = logs[member]
            assert f"member {k} of group {group}: {rounds} rounds trained (splitfed)" in log, report
            rows = ROUND_ROW.findall(log)
            assert [int(row[0]) for row in rows] == list(range(rounds)), f"{member}'s rounds:\n{log[-3000:]}"
            timings[f"{member} local accuracy"] = float(rows[-1][3])
            (final,) = GROUP_TEST.findall(log)
            finals[member] = final
        accuracies = {accuracy for _loss, accuracy in finals.values()}
        assert len(accuracies) == 1, f"the members report different group models: {finals}"
        (accuracy,) = accuracies
        losses = [float(loss) for loss, _accuracy in finals.values()]
        assert max(losses) - min(losses) <= 1e-3, finals
        assert float(accuracy) >= MIN_GROUP_ACCURACY, report
        timings["group accuracy"] = float(accuracy)

        # The aggregator closed every round with all three members, never at its deadline; the server kept each
        # member's part of each round and holds no aggregator (the model owner never sees first parts).
        aggregator_log = logs["aggregator"]
        for round_ in range(rounds):
            assert f"group {group}: round {round_} closed with {len(MEMBERS)} members" in aggregator_log, report
        assert f"group {group}: all {rounds} rounds trained" in aggregator_log, report
        assert "without member" not in aggregator_log, aggregator_log
        assert len(re.findall(rf"kept the part of member \d for {group} round \d+", logs["server"])) == rounds * 3
        on_server = found.call("exec", names["server"], "split-health", "--service", AGGREGATOR_SERVICE)
        assert on_server.returncode == 1 and "NOT_FOUND" in on_server.output, on_server.output
        apart = found.call(
            "exec", names["aggregator"], "split-health", "--target", aggregator_address, "--service", AGGREGATOR_SERVICE
        )
        assert apart.returncode == 0, apart.output

        # Both keep their state in their named volumes: the aggregator every round (with the members it counted),
        # the server every contribution of the last round.
        record = json.loads(
            (volume_path(found, f"{project}_aggregator-state") / "aggregator" / group / "group.json").read_text()
        )
        assert record["round"] == rounds and record["members"] == len(MEMBERS), record
        assert record["history"] == [[round_, [1, 2, 3]] for round_ in range(rounds)], record
        kept = {path.name for path in volume_files(found, f"{project}_server-state")}
        assert {f"round-{rounds - 1}-member-{k}.npz" for k in (1, 2, 3)} <= kept, sorted(kept)
    finally:
        gone = found.compose(project, *files, "down", "--volumes", extra=extra)
        timings["down"] = gone.seconds
        print(f"\nengine timings, docker-compose.multi.yml (s): {timings}")
    assert gone.returncode == 0, gone.output
    volumes = found.run("volume", "ls", "--quiet").split()
    assert not [volume for volume in volumes if volume.startswith(project)], volumes


def test_vertical_compose_a_label_party_and_two_feature_parties_train(image: Image) -> None:
    """docker-compose.vertical.yml as its header's scripted form runs it: `up --detach`, `docker wait` for every
    container (the one-shot data service included), their logs, `down --volumes`; on the image built above."""
    found = image.engine
    project = f"splitvertical{os.getpid()}"
    files = ("--file", str(VERTICAL_COMPOSE_FILE))
    extra = {"SPLIT_IMAGE": image.tag}
    config = services(resolved(VERTICAL_COMPOSE_FILE))
    epochs = int(config["label-party"].environment["SPLIT_EPOCHS"])
    digits = vertical_data.digits_halves()
    common = set(digits.tables[0].ids).intersection(*(table.ids for table in digits.feature_parties))
    timings: dict[str, float] = {}
    logs: dict[str, str] = {}

    def collect(names: dict[str, str]) -> str:
        for service, name in names.items():
            logs[service] = ANSI.sub("", found.call("logs", name).output)
        return "\n".join(f"--- {service}:\n{text[-2500:]}" for service, text in logs.items())

    try:
        since = time.time()
        up = found.compose(project, *files, "up", "--detach", extra=extra)
        assert up.returncode == 0, f"up failed:\n{up.output[-6000:]}"
        timings["up"] = up.seconds
        names = {service: container_name(found, project, service) for service in VERTICAL_SERVICES}
        started = time.monotonic()
        try:
            waited = found.call("wait", *names.values(), timeout=COMPOSE_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the parties did not finish in {COMPOSE_TIMEOUT:g} s:\n{collect(names)}")
        until = time.time()
        timings["parties"] = time.monotonic() - started
        report = collect(names)
        assert waited.returncode == 0 and waited.output.split() == ["0"] * len(names), (
            f"exit statuses {dict(zip(names, waited.output.split(), strict=False))}:\n{report}"
        )

        # The order compose promises: the files written before any party started, the feature parties started
        # once the label party was healthy.
        events = found.events(since, until + 1)
        (written,) = service_events(events, "data", "die")
        for party in ("label-party", "left", "right"):
            (party_start,) = service_events(events, party, "start")
            assert written < party_start, f"{party} started before the data service had written the files"
        healthy = service_events(events, "label-party", "health_status: healthy")
        assert healthy, f"the label party was never healthy: {events}"
        for party in ("left", "right"):
            (party_start,) = service_events(events, party, "start")
            assert min(healthy) < party_start, f"{party} started before the label party was healthy"
        for service in names:
            user = container(found, project, service)["Config"]["User"]
            assert user == "split:split", f"{service}: {user}"

        # The alignment: every party holds its own ids, and the three meet on those all of them hold.
        assert [line.rsplit("/", 1)[1] for line in logs["data"].split()] == ["label.npz", "left.npz", "right.npz"]
        label = logs["label-party"]
        (aligned,) = ALIGNED_LINE.findall(label)
        rows, train, test, steps = (int(value) for value in aligned)
        assert rows == len(common) and train + test == rows and test == round(0.2 * rows), aligned
        for party, table in zip(("left", "right"), digits.feature_parties, strict=True):
            expected = f"{party}: aligned rows {rows} of its {len(table.ids)}; steps {steps} (final step {steps})"
            assert expected in logs[party], report

        # The label party's epochs, each with its held-out metrics, and its final held-out accuracy.
        epoch_lines = EPOCH_LINE.findall(label)
        assert [(int(e), int(of)) for e, of, _step, _acc in epoch_lines] == [(e, epochs) for e in range(1, epochs + 1)]
        assert int(epoch_lines[-1][2]) == steps
        (final,) = FINAL_LINE.findall(label)
        accuracy = float(final[1])
        assert accuracy == float(epoch_lines[-1][3]), report
        assert accuracy >= MIN_VERTICAL_ACCURACY, report
        timings["held-out accuracy"] = accuracy
    finally:
        gone = found.compose(project, *files, "down", "--volumes", extra=extra)
        timings["down"] = gone.seconds
        print(f"\nengine timings, docker-compose.vertical.yml (s): {timings}")
    assert gone.returncode == 0, gone.output
    volumes = found.run("volume", "ls", "--quiet").split()
    assert not [volume for volume in volumes if volume.startswith(project)], volumes
