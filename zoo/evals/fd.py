"""FD-zoo: Fréchet distance between a zoo classifier's features of generated and real images.

Legend: N examples, B batch, H/W height/width, C channels, K classes, F feature width.

Not FID: the features come from a small classifier trained by the zoo itself
(`experiments/shapes_classifier.py`), so values are comparable only for the same classifier
checkpoint, split and `num_samples`. With `class_accuracy` the same classifier also judges
whether each generated image shows the class it was asked for.
"""

import logging
import os

import numpy as np
import scipy.linalg

from zoo.evals import generation

log = logging.getLogger('zoo')
_CLASSIFIERS = {}  # Loaded classifier runs, by absolute workdir.
_REAL_STATS = {}  # (classifier, step, data, split, n, seed) -> (mu_F, sigma_FxF).


def gaussian_stats(feats_NxF):
  """(mean_F, covariance_FxF) in float64 of feature rows."""
  feats = np.asarray(feats_NxF, np.float64)
  return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1_F, sigma1_FxF, mu2_F, sigma2_FxF, eps=1e-6):
  """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians.

  The square root is scipy.linalg.sqrtm's, real part; if it is not finite (S1 S2 nearly
  singular) both covariances are offset by eps * I first, as pytorch-fid does.
  """
  diff = np.asarray(mu1_F, np.float64) - np.asarray(mu2_F, np.float64)
  s1 = np.atleast_2d(sigma1_FxF).astype(np.float64)
  s2 = np.atleast_2d(sigma2_FxF).astype(np.float64)
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  if not np.isfinite(covmean).all():
    offset = eps * np.eye(s1.shape[0])
    covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean.real))


class ZooClassifier:
  """A finished classification run: its config and (logits_BxK, feats_BxF) of [0, 1] images."""

  def __init__(self, workdir):
    from zoo import runs  # Here, not at the top: runs imports the evaluator registry.
    self.workdir = os.path.abspath(workdir)
    self.config, setup, state = runs.load(self.workdir)
    if self.config.task.name != 'classification':
      raise ValueError(f'{self.workdir} is a {self.config.task.name!r} run, not a classification '
                       'run (experiments/shapes_classifier.py)')
    self.step = int(np.asarray(state['step']))
    self.task, self.params = setup.task, state['ema_params']

  @property
  def key(self):
    """Identifies the features: which run, which checkpoint."""
    return (self.workdir, self.step)

  def __call__(self, images_BxHxWxC):
    """Logits and pooled features (numpy) of images in [0, 1]."""
    x = 2.0 * np.asarray(images_BxHxWxC, np.float32) - 1.0  # The data pipeline's [-1, 1].
    return (np.asarray(self.task.predict['logits'](self.params, x)),
            np.asarray(self.task.predict['features'](self.params, x)))


def load_classifier(workdir, where):
  """The (cached) ZooClassifier of `workdir`; FileNotFoundError naming `where` if it is missing."""
  generation.require_dir(workdir, f'{where}.classifier_workdir')
  path = os.path.abspath(workdir)
  if path not in _CLASSIFIERS:
    _CLASSIFIERS[path] = ZooClassifier(path)
  return _CLASSIFIERS[path]


def classify(classifier, images_NxHxWxC, batch_size):
  """(logits_NxK, feats_NxF) of images in [0, 1], `batch_size` at a time."""
  outs = [classifier(images_NxHxWxC[i:i + batch_size])
          for i in range(0, len(images_NxHxWxC), batch_size)]
  return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def label_space_mismatch(classifier_config, config):
  """Why the classifier's classes are not the model's ('' when they are the same)."""
  for what, mine, theirs in (
      ('data.name', config.data.name, classifier_config.data.name),
      ('data.label_key', config.data.label_key, classifier_config.data.label_key),
      ('model.num_classes', config.model.get('num_classes', 0),
       classifier_config.model.num_classes)):
    if mine != theirs:
      return f'the model has {what}={mine!r}, the classifier {theirs!r}'
  return ''


class FDZoo:
  """FD-zoo of `num_samples` generated images against as many real ones of `split`.

  Metrics: 'fd_zoo', and for class-conditional models whose classes are the classifier's
  (same data.name, data.label_key, num_classes) 'class_accuracy': how often the classifier's
  argmax on a generated image is the class requested.
  """

  SCHEMA = {'type': str, 'classifier_workdir': str, **generation.SAMPLING_SCHEMA}

  @staticmethod
  def check(cfg, config, where):
    if not cfg.classifier_workdir:
      raise ValueError(f'{where}.classifier_workdir must name a classification run '
                       '(train one with experiments/shapes_classifier.py)')
    generation.check_sampling(cfg, where)

  def __init__(self, cfg, *, task, config, workdir, classifier=None):
    """`classifier` (tests): anything with `.config`, `.key`, `__call__` like ZooClassifier."""
    self.cfg, self.task, self.data_cfg = cfg, task, config.data
    self.where = generation.where(config, cfg)
    self.kind = generation.conditioning(task)
    self.classifier = classifier or load_classifier(cfg.classifier_workdir, self.where)
    theirs = self.classifier.config.data.resolution
    if theirs != config.data.resolution:
      raise ValueError(f'{self.where}: the classifier was trained at data.resolution={theirs}, '
                       f'the model generates at {config.data.resolution}')
    self.skip_accuracy = ''
    if self.kind != 'class':
      self.skip_accuracy = f'the model is not class-conditional ({self.kind!r})'
    else:
      self.skip_accuracy = label_space_mismatch(self.classifier.config, config)
    if self.skip_accuracy:
      log.info('%s: no class_accuracy: %s', self.where, self.skip_accuracy)

  def real_stats(self, real):
    """(mu, sigma) of the classifier's features of the real set, cached per classifier and set."""
    cfg = self.cfg
    key = (self.classifier.key, generation.data_key(self.data_cfg), cfg.split, cfg.num_samples,
           cfg.seed)
    if key not in _REAL_STATS:
      _, feats = classify(self.classifier, (real.images_NxHxWxC + 1.0) / 2.0, cfg.batch_size)
      _REAL_STATS[key] = gaussian_stats(feats)
    return _REAL_STATS[key]

  def run(self, state, step):
    cfg = self.cfg
    real = generation.real_set(self.data_cfg, cfg.split, cfg.num_samples, cfg.seed, self.where)
    images = generation.generate(self.task, generation.params_of(state, cfg.use_ema), cfg, real)
    logits, feats = classify(self.classifier, images, cfg.batch_size)
    out = {'fd_zoo': frechet_distance(*gaussian_stats(feats), *self.real_stats(real))}
    if not self.skip_accuracy:
      out['class_accuracy'] = float(np.mean(logits.argmax(-1) == real.labels_N))
    return out
