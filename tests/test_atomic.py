"""io.atomic: stale temporaries of a killed writer are removed, and nothing else."""

from __future__ import annotations

from pathlib import Path

from bsafuse.io.atomic import atomic_path, remove_stale_temporaries


def test_stale_temporaries_of_the_target_go_and_other_files_stay(tmp_path: Path) -> None:
    target = tmp_path / "fused[1].nii.gz"  # brackets: a name that a glob pattern would misread
    orphans = [tmp_path / ".fused[1].nii.gz.0a1b2c3d.tmp.nii.gz", tmp_path / ".fused[1].nii.gz.ffffffff.tmp.nii.gz"]
    keep = [
        tmp_path / ".fused[1].nii.gz.notahex.tmp.nii.gz",  # not a token atomic_path makes
        tmp_path / ".other.png.0a1b2c3d.tmp.png",  # another target's temporary
        tmp_path / "fused[1].nii.gz",  # the output itself
    ]
    for path in (*orphans, *keep):
        path.write_bytes(b"x")
    assert sorted(remove_stale_temporaries(target)) == sorted(orphans)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in keep)
    assert remove_stale_temporaries(tmp_path / "missing" / "x.png") == []


def test_the_names_it_removes_are_the_names_atomic_path_makes(tmp_path: Path) -> None:
    target = tmp_path / "out.png"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        assert remove_stale_temporaries(target) == [tmp]  # what a kill -9 here would leave
        tmp.write_bytes(b"whole")  # (re-created, so the rename below still has a file)
    assert target.read_bytes() == b"whole"
