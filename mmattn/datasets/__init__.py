from .synthetic import CLASSES, make_synthetic_coco

__all__ = ['CLASSES', 'make_synthetic_coco']
