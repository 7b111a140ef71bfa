"""The export formats by name: light enough for the CLI to list them without loading Arrow."""

FORMATS = ("labelstudio", "coco", "fiftyone", "csv")
PREDICTION_FORMATS = ("labelstudio", "coco", "fiftyone")
