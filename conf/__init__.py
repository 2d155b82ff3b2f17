"""The Hydra configs of the train app, shipped as package data of ``bitnet_dist.conf``.

``conf/train.yaml`` is the primary config; each folder is a config group (``model=``, ``precision=``, ...).
The train app loads them through the package (``pkg://bitnet_dist.conf``), so the same files serve a
source checkout (editable install) and an installed wheel.
"""
