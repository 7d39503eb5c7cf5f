"""Label vocabularies of the two datasets and the PASCAL-Part -> 6 human-part grouping (Part B §5)."""

from __future__ import annotations

VOC_CLASSES: tuple[str, ...] = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)  # PASCAL-Context MTL semseg: 0 = background, 1-20 = VOC classes

PERSON_CLASS = VOC_CLASSES.index("person")  # 15: the PASCAL-Part ``class_ind`` of a person

HUMAN_PART_NAMES: tuple[str, ...] = (
    "background",
    "head",
    "torso",
    "upper_arms",
    "lower_arms",
    "upper_legs",
    "lower_legs",
)

# PASCAL-Part person part names -> the 6 groups used by the benchmark (0 = background).
HUMAN_PART: dict[str, int] = {
    **dict.fromkeys(("hair", "head", "lear", "rear", "leye", "reye", "lebrow", "rebrow", "mouth", "nose"), 1),
    **dict.fromkeys(("torso", "neck"), 2),
    **dict.fromkeys(("luarm", "ruarm"), 3),
    **dict.fromkeys(("llarm", "rlarm", "lhand", "rhand"), 4),
    **dict.fromkeys(("luleg", "ruleg"), 5),
    **dict.fromkeys(("llleg", "rlleg", "lfoot", "rfoot"), 6),
}

NYU40_CLASSES: tuple[str, ...] = (
    "wall",
    "floor",
    "cabinet",
    "bed",
    "chair",
    "sofa",
    "table",
    "door",
    "window",
    "bookshelf",
    "picture",
    "counter",
    "blinds",
    "desk",
    "shelves",
    "curtain",
    "dresser",
    "pillow",
    "mirror",
    "floor mat",
    "clothes",
    "ceiling",
    "books",
    "refrigerator",
    "television",
    "paper",
    "towel",
    "shower curtain",
    "box",
    "whiteboard",
    "person",
    "night stand",
    "toilet",
    "sink",
    "lamp",
    "bathtub",
    "bag",
    "otherstructure",
    "otherfurniture",
    "otherprop",
)  # NYUD-v2 semseg after the shift: 0-39 (the file stores 1-40, 0 = unlabeled)

CLASS_NAMES: dict[str, dict[str, tuple[str, ...]]] = {
    "pascal_context": {"semseg": VOC_CLASSES, "human_parts": HUMAN_PART_NAMES},
    "nyud": {"semseg": NYU40_CLASSES},
}
