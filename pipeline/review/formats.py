"""The export formats by name: light enough for the CLI to list them without loading Arrow."""

FORMATS = ("labelstudio", "coco", "fiftyone", "csv")
# Formats that carry predictions: by default they take ok rows only, since failed rows have no label,
# no boxes and usually no size. CSV takes every row unless --status says otherwise.
PREDICTION_FORMATS = ("labelstudio", "coco", "fiftyone")
