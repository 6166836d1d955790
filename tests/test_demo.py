"""``cbm demo`` ends with a newcomer's next steps: every file it wrote, with its size, and the editor commands.

The sections are stubbed (the real demo trains every family for minutes): each writes its real file names through
``_Demo.wrote``, as the real sections do, so the listing, the results and the printed commands are the real code's.
"""

from pathlib import Path

import pytest

from cbm import cli, demo


@pytest.fixture
def quick_demo(monkeypatch):
    def init(self, out, cache_dir, sizes, progress):
        self.out, self.rows, self.results, self.written = Path(out), [], {}, []

    def writes(*names):
        def section(self):
            for name in names:
                path = self.wrote(self.out / name)
                if name.endswith(".cbm"):
                    path.write_bytes(b"bundle")
                else:
                    path.mkdir()
                    (path / "index.html").write_text("report")
            self.row(f"{names[0]} (accuracy)", 0.5)
        return section

    monkeypatch.setattr(demo._Demo, "__init__", init)
    monkeypatch.setattr(demo._Demo, "backbones", lambda self: self.row("zero-shot (accuracy)", 0.5))
    monkeypatch.setattr(demo._Demo, "posthoc", writes("toy_clip_text_bank", "pcbm_toy_clip.cbm", "audit"))
    monkeypatch.setattr(demo._Demo, "language", writes("labo_1shot_toy_clip.cbm", "sparse_toy_clip.cbm"))
    monkeypatch.setattr(demo._Demo, "energy", writes("ecbm_toy_cnn.cbm"))
    monkeypatch.setattr(demo._Demo, "temporal", writes("motif_toy_clip.cbm"))


def test_the_demo_lists_every_file_it_wrote_and_how_to_open_one(quick_demo, tmp_path, capsys):
    out = tmp_path / "demo"
    results = demo.run_demo(out, progress=False)
    files = [Path(name) for name in results["files"]]
    assert {path.name for path in files} >= {"pcbm_toy_clip.cbm", "labo_1shot_toy_clip.cbm", "sparse_toy_clip.cbm",
                                             "ecbm_toy_cnn.cbm", "motif_toy_clip.cbm", "toy_clip_text_bank",
                                             "audit", "demo.json"}
    assert all(path.exists() for path in files), files

    out = tmp_path / "from the command line"
    assert cli.main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for path in files:
        assert str(out / path.name) in printed and (out / path.name).exists()
    assert "demo.json  (" in printed and "KiB)" in printed
    assert f"cbm app {out / 'pcbm_toy_clip.cbm'}" in printed
    assert f"cbm app {out / 'motif_toy_clip.cbm'} --data toy:videos@val" in printed
