"""Federated neural compression (Lei et al. 2023): nonlinear transform coding learned across
heterogeneous clients, with shared transforms and personalized entropy models.

- :mod:`.models`: ``g_a``/``g_s`` (MLPs or conv + GDN) and a factorized prior;
- :mod:`.entropy`: the prior and its integer coding tables (range coding with ``constriction``);
- :mod:`.codec`: compress data to real bytes and back, the ``.fcn`` file format;
- :mod:`.sources`: synthetic, Fashion-MNIST label-skew and photo clients;
- :mod:`.federated`: training on fedcodec's engine (federated / global / local), refits, evaluation;
- :mod:`.experiment`: the λ sweep, BD-rates and plots behind ``fedcodec neural train``;
- :mod:`.photos`, :mod:`.standard`, :mod:`.bdrate`: photographs, JPEG/WebP, Bjøntegaard metrics.
"""
