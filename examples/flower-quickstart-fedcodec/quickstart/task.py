"""quickstart: the model, the data and the train/test functions."""

import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    """A small CNN for 28x28 grayscale images."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 4 * 4)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


_cache = {}


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def _fashion_mnist(data_dir: str, split: str):
    if (data_dir, split) not in _cache:
        prefix = "train" if split == "train" else "t10k"
        images = _read_idx(Path(data_dir) / f"{prefix}-images-idx3-ubyte.gz")
        labels = _read_idx(Path(data_dir) / f"{prefix}-labels-idx1-ubyte.gz")
        x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        _cache[data_dir, split] = ((x - 0.5) / 0.5, torch.from_numpy(labels.astype(np.int64)))
    return _cache[data_dir, split]


def load_data(partition_id: int, num_partitions: int, batch_size: int, data_dir: str, examples: int = 0):
    """This node's IID share of Fashion-MNIST's training and test sets (at most ``examples`` of each
    when it is not 0)."""
    loaders = []
    for split in ("train", "test"):
        x, y = _fashion_mnist(data_dir, split)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(42))
        part = order[partition_id::num_partitions]
        if examples:
            part = part[:examples]
        loaders.append(DataLoader(TensorDataset(x[part], y[part]), batch_size=batch_size, shuffle=split == "train"))
    return loaders[0], loaders[1]


def train(net, trainloader, epochs, lr, device):
    """Train the model on the training set."""
    net.to(device)
    criterion = nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for images, labels in trainloader:
            optimizer.zero_grad()
            loss = criterion(net(images.to(device)), labels.to(device))
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    return running_loss / (epochs * len(trainloader))


def test(net, testloader, device):
    """Validate the model on the test set."""
    net.to(device)
    criterion = nn.CrossEntropyLoss()
    correct, loss = 0, 0.0
    net.eval()
    with torch.no_grad():
        for images, labels in testloader:
            outputs = net(images.to(device))
            loss += criterion(outputs, labels.to(device)).item()
            correct += (torch.max(outputs.data, 1)[1] == labels.to(device)).sum().item()
    return loss / len(testloader), correct / len(testloader.dataset)
