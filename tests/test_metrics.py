import io
import json
import sys

from qat_jax import console, metrics


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal(monkeypatch):
    err = _Tty()
    monkeypatch.setattr(sys, "stderr", err)
    p = console.Progress(total=100, initial=10)
    p.update(50, loss=3.14159, lr=1e-3, tokens_per_s=12345.6)
    p.close()
    text = err.getvalue()
    assert "50/100" in text and "loss=3.142" in text and "lr=1.00e-03" in text
    assert "tok_s=12,346" in text


def test_plain_lines_when_not_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    p = console.Progress(total=100, initial=0)
    p.update(50, loss=3.14159, lr=1e-3, tokens_per_s=12345.6)
    p.message("hello")
    p.close()
    assert capsys.readouterr().out.splitlines() == [
        "step 50/100  loss 3.1416  lr 1.000e-03  tokens/s 12,346", "hello"]


def test_metrics_writer_jsonl(tmp_path):
    import numpy as np

    w = metrics.MetricsWriter(tmp_path, tensorboard=False)
    w.write(5, loss=np.float32(2.5), tokens=640)
    w.write(10, val_loss=2.0)
    w.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 5, "loss": 2.5, "tokens": 640}, {"step": 10, "val_loss": 2.0}]
