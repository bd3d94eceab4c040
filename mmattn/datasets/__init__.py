from .synthetic import CLASSES, make_synthetic_coco
from .validate import AnnotationError, AnnotationReport, validate_coco

__all__ = ['CLASSES', 'AnnotationError', 'AnnotationReport', 'make_synthetic_coco',
           'validate_coco']
