"""The training command line: ``cls_train.py`` (``python DEQ/tools/cls_train.py``, or ``deq-train`` once the
toolkit is installed; both run :func:`DEQ.tools.cls_train.main`)."""
