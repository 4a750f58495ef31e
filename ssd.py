"""SSD: Single Shot MultiBox Detector (Liu et al. 2016, arXiv 1512.02325) in one file.

Read top to bottom: class lists and presets, the network (VGG16 backbone, L2Norm, extra layers,
heads), anchors, box coding, matching, the loss with hard-negative mining, post-processing,
inference on images, and loading checkpoints (ours and foreign formats).

Conventions (see ../shared/DESIGN.md): boxes are xyxy; inside the model they are normalised to
[0, 1] of the network input, at the edges (files, CLI, JSON) absolute pixels of the original image.
Label 0 is background, 1..C are objects. Anchors are (cx, cy, w, h), normalised.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]
# The 80 COCO categories in ascending category-id order; label i (1..80) is COCO_CLASSES[i-1]
# and COCO_CATEGORY_IDS[i-1] (facts §13.1: ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 are unused).
COCO_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
]
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
