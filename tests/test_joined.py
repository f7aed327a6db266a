"""`split-join`: the trained parts, handed over as .keras files, make one uncut model whose outputs are the split
pipeline's (`SplitClient.predict` over a live server) on the test data, for the standard and the U-shaped cut."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from client_part import SplitClient
from server_part import SplitServer
from splitlearning import joined
from tests.conftest import build_bottom, build_top, make_data, make_loss
from tests.ushape_support import build_head, build_middle

# Each part runs the same kernels on the same inputs in the split pipeline and in the joined model, in this
# process; only the IV's trip through the wire (raw float32, bit for bit) lies between them.
RTOL = 1e-6


def _save(model: keras.Model, path: Path) -> Path:
    model.save(path)
    return path


def test_joined_standard_cut_predicts_as_the_split_pipeline(tmp_path: Path) -> None:
    x, y = make_data(60, seed=5)
    with SplitServer(build_top(), make_loss(), "adam", ["accuracy"]) as server:
        target = f"127.0.0.1:{server.start('127.0.0.1:0')}"
        with SplitClient(build_bottom(), "adam", target=target, connect_timeout=10) as client:
            client.fit(x, y, batch_size=10, epochs=2, verbose=0)
            split = client.predict(x, batch_size=16)
            first = _save(client.model, tmp_path / "first.keras")
            second = _save(server.session(client.session_id).trainer.model, tmp_path / "second.keras")
    out = tmp_path / "joined.keras"
    assert joined.main([str(first), str(second), "--output", str(out)]) == 0
    model = keras.saving.load_model(out)
    np.testing.assert_allclose(model.predict(x, verbose=0), split, rtol=RTOL, atol=1e-6)
    assert not np.allclose(split, build_top()(build_bottom()(x)).numpy(), atol=1e-3), "training changed nothing"


def test_joined_ushape_predicts_as_the_split_pipeline(tmp_path: Path) -> None:
    x, y = make_data(60, seed=6)
    with SplitServer(build_middle(), optimizer="adam", cut="ushape") as server:
        target = f"127.0.0.1:{server.start('127.0.0.1:0')}"
        head = build_head()
        with SplitClient(build_bottom(), "adam", target=target, head=head, loss=make_loss()) as client:
            client.fit(x, y, batch_size=10, epochs=2, verbose=0)
            split = client.predict(x, batch_size=16)
            assert client.head is not None
            parts = [
                _save(client.model, tmp_path / "first.keras"),
                _save(server.session(client.session_id).trainer.model, tmp_path / "middle.keras"),
                _save(client.head.model, tmp_path / "head.keras"),
            ]
    out = tmp_path / "joined.keras"
    assert joined.main([*map(str, parts), "--output", str(out)]) == 0
    np.testing.assert_allclose(keras.saving.load_model(out).predict(x, verbose=0), split, rtol=RTOL, atol=1e-6)


def test_parts_that_do_not_chain_are_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, head = _save(build_bottom(), tmp_path / "first.keras"), _save(build_head(), tmp_path / "head.keras")
    assert joined.main([str(first), str(head), "--output", str(tmp_path / "joined.keras")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "part 2 (head) takes [batch, 7], but part 1" in line and "gives [batch, 5]" in line
    assert not (tmp_path / "joined.keras").exists()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["a.keras", "--output", "j.keras"], "expected 2 parts (first, second) or 3"),
        (["a.h5", "b.keras", "--output", "j.keras"], "a.h5: expected a .keras file"),
        (["a.keras", "b.keras", "--output", "j.keras"], "no such file: a.keras, b.keras"),
    ],
)
def test_mistakes_end_in_one_line(argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        joined.main(argv)
    assert exited.value.code == 2
    assert expected in capsys.readouterr().err.strip().splitlines()[-1]
