"""The image and docker-compose.yml on a real container engine: build the image from this checkout, run the pair
with compose, check what a user would, bring it down and up again (it must resume finished, not retrain), then
remove it. Needs the engine scripts/docker_engine.sh starts (.ci/run runs the tests under it)."""

from __future__ import annotations

import os
import re
import time
from typing import Any

from tests.engine_support import Engine, build_image, engine, free_port, volume_files

MIN_ACCURACY = 0.9  # the demo (digits-mlp, 10 epochs) reaches about 0.96; chance is 0.1
FINISHED_STEP = re.compile(r"trained \d+ epochs, (\d+) steps")
TEST_ACCURACY = re.compile(r"^client_1 +\| test loss: [0-9.]+, accuracy: ([0-9.]+)$", re.MULTILINE)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def service_events(events: list[dict[str, Any]], service: str, action: str) -> list[int]:
    """When (ns) a compose service's container did `action` ('start', 'health_status: healthy', ...)."""
    return [
        int(event["timeNano"])
        for event in events
        if event.get("Action") == action and event["Actor"]["Attributes"].get("com.docker.compose.service") == service
    ]


def container(engine: Engine, project: str, service: str) -> dict[str, Any]:
    (found,) = [
        name
        for name in engine.run("ps", "--all", "--format", "{{.Names}}").split()
        if name == f"{project}_{service}_1" or name == f"{project}-{service}-1"  # compose v1 / v2 names
    ]
    return engine.inspect("container", found)


def test_compose_trains_resumes_finished_and_cleans_up() -> None:
    found = engine()
    project = f"splitci{os.getpid()}"
    image = f"splitlearning:ci-{os.getpid()}"
    extra = {"SPLIT_IMAGE": image, "SPLIT_PORT": str(free_port())}
    timings: dict[str, float] = {}
    try:
        # The image, built once with BuildKit (the proxy's CA as a secret); compose's `--build` then finds every
        # layer in the same cache.
        build = build_image(found, image)
        assert build.returncode == 0, f"docker build failed:\n{build.output[-6000:]}"
        assert "SYS_UID_MAX" not in build.output, "useradd warns about the image's user"
        timings["build"] = build.seconds

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
        uid = found.run("run", "--rm", "--entrypoint", "id", image, "-u").strip()
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
        found.run("image", "rm", "--force", image, check=False)
        print(f"\nengine timings (s): {timings}")
    assert gone.returncode == 0, gone.output
    volumes = found.run("volume", "ls", "--quiet").split()
    assert not [volume for volume in volumes if volume.startswith(project)], volumes
