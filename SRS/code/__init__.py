"""The certification command lines, thin wrappers over ``SRS.cli`` and ``SRS.analysis``.

Each script's ``main`` is also a console command of the installed toolkit (``setup.cfg``'s entry points):

=====================  =================================
console command        script
=====================  =================================
``deq-certify``        ``SRS/code/certify.py``
``deq-predict``        ``SRS/code/predict.py``
``deq-certify-qcrs``   ``SRS/code/certify_qcrs.py``
``deq-attack``         ``SRS/code/attack.py``
``deq-analyze``        ``SRS/code/analyze.py``
=====================  =================================
"""
