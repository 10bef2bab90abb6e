"""Progress output off a terminal: plain lines, no carriage-return redraws."""
import io

from nad_ext._utils import progress


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_off_a_terminal_a_bar_prints_one_line_when_it_closes(capsys):
    bar = progress.bar(5, "epoch 1/3", unit="batch")  # pytest's stderr is not a terminal
    assert isinstance(bar, progress.LineProgress)
    for _ in range(5):
        bar.update(1)
    bar.set_postfix(ce="0.123", img_s="42")
    bar.close()
    bar.close()  # closing twice prints once
    err = capsys.readouterr().err
    assert "\r" not in err and err.count("\n") == 1
    assert err.startswith("epoch 1/3: 5/5 batches in ") and err.endswith(" s, ce 0.123, img_s 42\n")


def test_a_long_bar_reports_every_interval():
    out = io.StringIO()
    bar = progress.LineProgress(3, "hit rate", "batch", stream=out, interval=0.0)
    bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("hit rate: 1/3 batch after ") and lines[1].startswith("hit rate: 1/3 batch in ")


def test_terminals_get_tqdm_and_disabled_bars_print_nothing(capsys):
    assert progress.interactive(FakeTerminal()) and not progress.interactive(io.StringIO())
    bar = progress.bar(3, "quiet", enabled=False)
    bar.update(3)
    bar.close()
    assert capsys.readouterr().err == ""
