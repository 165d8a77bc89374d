"""Input pipelines: TFDS data sources, grain pipelines, transforms, mixup/cutmix, dataset builders."""
