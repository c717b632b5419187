"""Where results go: `--out` never mixes two runs (a directory that holds files is refused unless `--overwrite`,
which clears the earlier run's results and plots first); `--render` on a results.json it cannot read is one line
naming the file and what is wrong, never a traceback."""

from __future__ import annotations

import io
import json
import pathlib

import pytest

from flashpatch.bench import cli


@pytest.fixture(autouse=True)
def _nothing_is_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's plumbing only: every scenario measures nothing."""
    from flashpatch.bench.scenarios import core, gemma, gemma_fast, openpi

    for module in (core, gemma, gemma_fast, openpi):
        monkeypatch.setattr(module, "run", lambda harness: None)


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    out = io.StringIO()
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv, stream=out)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, (argv, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m flashpatch.bench: error: "), (argv, err)
    assert "Traceback" not in err
    return lines[0]


def _earlier_run(directory: pathlib.Path) -> None:
    directory.mkdir(exist_ok=True)
    (directory / "results.json").write_text('{"earlier": true}\n')
    (directory / "results.md").write_text("earlier\n")
    (directory / "gemma.png").write_bytes(b"earlier plot")


def test_out_refuses_a_directory_that_holds_an_earlier_run(tmp_path: pathlib.Path, capsys) -> None:
    _earlier_run(tmp_path / "out")
    line = _one_line_error(["--quick", "--scenarios", "core", "--out", str(tmp_path / "out")], capsys)
    assert "--out" in line and "--overwrite" in line and "results.json" in line, line
    assert (tmp_path / "out" / "results.json").read_text() == '{"earlier": true}\n', "the earlier run was touched"
    assert (tmp_path / "out" / "gemma.png").read_bytes() == b"earlier plot"


def test_overwrite_clears_the_earlier_run_so_no_old_plot_survives(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "out"
    _earlier_run(out)
    (out / "notes.txt").write_text("mine\n")
    stream = io.StringIO()
    assert cli.main(["--quick", "--scenarios", "core", "--out", str(out), "--overwrite"], stream=stream) == 0
    assert not (out / "gemma.png").exists(), "a plot of the earlier run survived beside the new data"
    document = json.loads((out / "results.json").read_text())
    assert "earlier" not in document and document["records"] == []
    assert (out / "notes.txt").read_text() == "mine\n", "a file the benchmark did not write was removed"
    assert "notes.txt" in stream.getvalue(), "the files left in place are not named"


def test_an_empty_directory_is_taken_as_it_is(tmp_path: pathlib.Path) -> None:
    (tmp_path / "out").mkdir()
    assert cli.main(["--quick", "--scenarios", "core", "--out", str(tmp_path / "out")], stream=io.StringIO()) == 0
    assert (tmp_path / "out" / "results.json").is_file()


@pytest.mark.parametrize(
    ("content", "said"),
    [
        ("{not json", "not valid JSON"),
        ('{"meta": {}}', "records"),
        ('{"records": [], "meta": {"device": {}}}', "meta"),
        ('{"meta": {"date": 1}, "records": [{"case": "x"}]}', "record"),
        ("[1, 2]", "not a results.json"),
    ],
)
def test_render_of_a_malformed_results_json_is_one_line(tmp_path: pathlib.Path, capsys, content, said) -> None:
    (tmp_path / "results.json").write_text(content)
    line = _one_line_error(["--render", str(tmp_path)], capsys)
    assert str(tmp_path / "results.json") in line and said in line, line
