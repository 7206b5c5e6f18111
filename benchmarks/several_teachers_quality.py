"""Do two teachers of different tokenizers beat the better one alone?

    python benchmarks/several_teachers_quality.py OUT [--seeds 0,1] [--students byte,bpe]

OUT is a finished `cross_tokenizer_quality.py OUT` run: its two teachers (byte-level and BPE,
trained on the same documents), its students' settings and its test figures are read from
there. For each student kind (`--students`: `byte`, the demo student on bytes; `bpe`, the same
shape on the 512-id BPE) and each reported seed, two more students are trained on the demo's
training documents and scored on its held-out documents (the test set):

- the student's own-tokenizer teacher alone (plain distillation, one vocabulary);
- both teachers (`teachers:`, weights 1 and 1: each teacher's term half of the distillation
  term), the other-tokenizer one compared as in that direction (`loss.cross_vocab`: `mapped`
  for the BPE student, `bytes` for the byte student).

Both use the KD setting `cross_tokenizer_quality.py` chose on its validation sweep for that
student kind (its direction with the other-tokenizer teacher), fixed a priori here; the
other-tokenizer teacher alone and the hard-label student are that run's figures, same seeds.
Writes OUT/several_teachers.json and prints the table; a full run keeps a copy in
benchmarks/results/several_teachers_quality.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cross_tokenizer_quality as single  # noqa: E402
from kd_jax import config as config_lib  # noqa: E402
from kd_jax.demo import recipe  # noqa: E402
from kd_jax.eval.report import format_table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# Each student kind: its direction in cross_tokenizer_quality.py (the other-tokenizer teacher),
# and its own-tokenizer teacher.
STUDENTS = {"byte": (single.DIRECTIONS[1], "byte"), "bpe": (single.DIRECTIONS[0], "bpe")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--students", default="byte,bpe")
    args = parser.parse_args(argv)
    out = args.out
    earlier = json.loads((out / "cross_quality.json").read_text())
    seeds = [int(seed) for seed in args.seeds.split(",")]
    demo = recipe(out, earlier["quick"])
    test = demo["distilled"].data
    bpe = str(out / "bpe_tokenizer.json")
    teacher_dirs = {"byte": str(out / "byte_teacher"), "bpe": str(out / "bpe_teacher")}
    summary = {"teachers": earlier["teachers"], "students": {}, "seeds": seeds}
    for kind in args.students.split(","):
        direction, own = STUDENTS[kind]
        reported = earlier["directions"][direction]
        kd = reported["sweep"]["chosen"]
        number = single.DIRECTIONS.index(direction)
        rows = {"hard labels": [reported["hard_labels"]["seeds"][str(s)]["bits_per_byte"]
                                for s in seeds],
                f"{reported['teacher']} teacher alone (other tokenizer)": [
                    reported["kd"]["seeds"][str(s)]["bits_per_byte"] for s in seeds],
                f"{own} teacher alone (same tokenizer)": [], "both teachers": []}
        # The direction's loss.cross_vocab names runs of another method than the first one's.
        method = single.METHODS[direction]
        prefix = f"several_{kind}" + ("" if method == "mapped" else f"_{method}")
        for seed in seeds:
            alone = single.student_config(demo, direction, bpe, teacher_dirs[own], test, seed,
                                          kd, out / f"{prefix}_own_s{seed}")
            rows[f"{own} teacher alone (same tokenizer)"].append(
                single.train_student(alone, kd)["bits_per_byte"])
            both = copy.deepcopy(alone)
            both.train.run_dir = str(out / f"{prefix}_both_s{seed}")
            both.teacher = config_lib.TeacherConfig()
            both.teachers = [{"source": "checkpoint", "path": path, "weight": 1}
                             for path in teacher_dirs.values()]
            config_lib.validate(both)
            rows["both teachers"].append(single.train_student(both, kd)["bits_per_byte"])
        stats = {name: {"seeds": values, **single.summarize(values)}
                 for name, values in rows.items()}
        alone_names = [name for name in stats if "alone" in name]
        better = min(alone_names, key=lambda name: stats[name]["mean"])
        gain = stats[better]["mean"] - stats["both teachers"]["mean"]
        margin = max(stats[better]["spread"], stats["both teachers"]["spread"])
        summary["students"][kind] = {
            "kd": kd, "method": method, "runs": stats, "better_alone": better, "gain_over_better": gain,
            "margin": margin, "beats_better_by_more_than_spread": gain > margin,
            "row": single.BYTE_STUDENT_ROW if kind == "byte" else single.BPE_STUDENT_ROW}
        print(f"\n{kind} student (KD {single.setting(kd)}), test bits/byte")
        print(format_table(["student", *(f"seed {s}" for s in seeds), "mean", "spread"],
                           [[name, *s["seeds"], s["mean"], s["spread"]]
                            for name, s in stats.items()]))
        print(f"both teachers against the better alone ({better}): {gain:+.4f} bits/byte "
              f"(spread {margin:.4f})")
    summary["quick"] = earlier["quick"]
    (out / "several_teachers.json").write_text(json.dumps(summary, indent=1) + "\n")
    if not earlier["quick"]:
        RESULTS.mkdir(exist_ok=True)
        shutil.copy(out / "several_teachers.json", RESULTS / "several_teachers_quality.json")
    print(f"wrote {out / 'several_teachers.json'}")
    return 0


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"{time.perf_counter() - start:.0f} s")
    sys.exit(code)
