"""`dinat bench`: the command runs, writes what it says, and rejects bad options in one line.

No timing is asserted here: performance numbers live in docs/performance.md.
"""

import json

from dinat.cli import main


def test_bench_scaling_part_writes_json_and_chart(tmp_path, capsys):
    output, plot = tmp_path / "bench.json", tmp_path / "scaling.png"
    code = main(["bench", "--parts", "scaling", "--sizes", "64,96", "--repeat", "1", "--threads", "1",
                 "--output", str(output), "--plot", str(plot)])
    assert code == 0
    results = json.loads(output.read_text())
    assert [row["size"] for row in results["rows"]] == [64, 96]
    assert all(row["ms_per_image"] > 0 for row in results["rows"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 96 |" in capsys.readouterr().out


def test_bench_bad_options_are_one_line_errors(capsys):
    assert main(["bench", "--parts", "everything"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("dinat bench: error: --parts must be") and "\n" not in err
    assert main(["bench", "--models", "huge"]) == 1
    assert "--models must be" in capsys.readouterr().err
