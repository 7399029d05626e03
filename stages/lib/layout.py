"""File names inside the stage folders: the contract between stages."""
from typing import Literal, get_args

# data/raw/ (download)
TRAIN_IMAGES = "train_images.tsv"   # key <TAB> base64 JPEG (layout: decode.columns; a breed column
                                    # there gives weak labels where a release has no click log)
TEST_IMAGES = "test_images.tsv"     # same layout as TRAIN_IMAGES
TEST_LABELS = "test_labels.tsv"     # key <TAB> breed (clean labels)
CLICKS = "clicks.tsv"               # key <TAB> query <TAB> clicks; absent: labels from the breed column
BREEDS = "breeds.tsv"               # breed <TAB> integer label
TRUTH = "truth.tsv"                 # key <TAB> true breed or "distractor"; sample only
CHECKSUMS = "SHA256SUMS"            # sha256sum format, one line per file above

RAW_FILES = (TRAIN_IMAGES, TEST_IMAGES, TEST_LABELS, BREEDS)  # required of every source
OPTIONAL_RAW_FILES = (CLICKS, TRUTH)

# data/images/ (decode)
INDEX = "index.parquet"             # key, split, shard, offset, length, width, height[, breed: the
                                    # image file's breed column, where decode.columns names one]
REJECTS = "rejects.tsv"             # file, line, key, reason
STATS = "stats.json"

# data/filtered/ (filter_clicks)
LABELS = "labels.tsv"               # key, label, breed, clicks, share (kept rows)
RAW_LABELS = "raw_labels.tsv"       # key, label, breed, clicks, share: top breed, no thresholds
DROPPED = "dropped.tsv"             # key, reason, breed, clicks, share
CLASSES = "classes.json"            # ordered class names; label = index in this list
REPORT = "report.json"

# models/references/<name>/ (train_references; evaluate scores each whose model file exists): the naive recipe
# on the raw clicks (the paper's baseline) and the true breeds (the ceiling, where truth.tsv exists), and the
# linear probes on the frozen features of a pretrained trunk (the pretrained regime's floor; probe_naive: on the
# click filter's labels, the naive model's own labels and, with train.head_init: probe, its starting head)
ReferenceName = Literal["raw", "truth", "probe_raw", "probe_naive", "probe_truth"]
REFERENCES: tuple[str, ...] = get_args(ReferenceName)

# model.weights as a file: it must lie here, a dependency (dvc.yaml) of every stage that reads the model params
WEIGHTS_DIR = "models/weights"

# models/naive/ and models/siamese/ (train_naive, train_siamese)
MODEL = "model.pt"                  # weights + classes + preprocessing (stages.lib.models)
EARLY_MODEL = "early.pt"            # naive only: the model after train.early_epoch epochs
VAL_PREDICTIONS = "val_predictions.tsv"  # naive only: key, label, pred, p_label on the validation split
CHECKPOINTS = "checkpoints"         # persisted by DVC; LAST_CHECKPOINT in it resumes an interrupted run
LAST_CHECKPOINT = "last.pt"
LIVE = "live"                       # dvclive: metrics.json, plots/metrics/*.tsv

# data/pairs/ (make_pairs)
CLEAN = "clean.tsv"                 # key, label, breed, clicks, share, p_label (probability-filtered)
SCORES = "scores.tsv"               # every click-filtered image with p_label from each scorer
PAIRS = "pairs.tsv"                 # key_a, key_b, same, kind

# reports/ (evaluate)
METRICS = "metrics.json"            # every model's test metrics, the comparison and the data block (CI checks it)
PER_CLASS = "per_class.tsv"         # test accuracy per breed and model
ABLATION = "ablation.md"            # the tables README's results block is made of
