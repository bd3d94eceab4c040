# tiny_retinanet.py whose classification loss turns NaN at iteration 5, after the checkpoint at 4.
_base_ = './tiny_retinanet.py'

custom_imports = dict(imports=['mmattn', 'nan_injection'], allow_failed_imports=False)
custom_hooks = [dict(type='InjectNaNClassScoresHook', iteration=5)]
