"""The quickstart demo trains: its loss falls."""

from __future__ import annotations

from lomix.recipes import demo


def test_demo_loss_falls(capsys):
    last = demo.main(["--steps", "25"])
    out = capsys.readouterr().out
    first = float(out.split("loss ")[-1].split(" ->")[0])
    assert last < first - 0.3, out
