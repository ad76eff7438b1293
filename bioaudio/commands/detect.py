"""Detect calls in long recordings: sliding windows, per-class thresholds, merged events.

MODEL is a classifier: an export folder or a run directory (its best/, else export/) of
`bioaudio train-baseline` or of a finetuned transformer. AUDIO is one or more files and folders
(every audio file under a folder). Each recording is cut into --window second windows every
--hop seconds (default: the model's training clip length, else 5 s; hop = window / 2), read by
seeking a batch at a time, so hours-long files take no more memory than short ones.

Probabilities are sigmoid per class for multi-label models and softmax over classes for
single-label ones. A window is positive for a class when its probability >= the class's
threshold (--threshold, or per class from --thresholds FILE, a CSV `class,threshold`); on
softmax outputs a threshold means "confident enough". Positive windows of a class that overlap
or touch (or are at most --merge_gap seconds apart) become one event, from the first window's
start to the last window's end, with its max and mean probability; events shorter than
--min_duration seconds are dropped. The last partial window of a recording is zero-padded and
scored when it holds at least 0.5 s; a recording shorter than one window but at least 0.5 s
long is scored as one padded window (a note says so); a shorter one is skipped.

OUT gets, per recording <name> (its path under the given folder, or its file name, without the
extension):
  <name>.selections.txt  a Raven selection table (Selection, View, Channel, Begin Time (s),
                         End Time (s), Low Freq (Hz), High Freq (Hz), Species, Max Prob,
                         Mean Prob); Raven Pro opens it, and put beside its recording it is read
                         by `bioaudio prepare` as call-level labels
  <name>.windows.csv     start, end and one probability column per class (--save_windows)
and for the whole call detections.csv (file, class, start, end, max_prob, mean_prob) and
skipped.csv (path, reason of files that could not be used).

Re-running the same command resumes: finished recordings are kept, new or interrupted ones are
processed. Files detect did not write are never replaced without --overwrite.

Examples:
  bioaudio detect runs/tiny/seed_42 recordings/ --out detections
  bioaudio detect runs/finetune night1.flac night2.flac --out det --window 3 --hop 1
  bioaudio detect runs/tiny/seed_42 recordings/ --out det --thresholds thresholds.csv \\
      --merge_gap 1 --min_duration 2 --ignore noise --save_windows
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bioaudio.config import add_options, config_from_args
from bioaudio.inference.detect import DetectConfig, detect_to_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="classifier export folder or run directory")
    parser.add_argument("audio", type=Path, nargs="+", help="audio files and/or folders")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: ./detections_<first AUDIO name>)",
    )
    add_options(parser, DetectConfig)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(DetectConfig, args)
    first = Path(args.audio[0]).expanduser()
    out = args.out or Path.cwd() / f"detections_{first.stem or first.name}"
    result = detect_to_folder(args.model, args.audio, out, cfg)
    print(result.summary())
    return 0
