"""The small MLP (64 -> 32 -> 10, ReLU; weights from torch seed 0) that the Horovod
compressor workers train on sklearn's digits."""
import torch


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(64, 32)
        self.fc2 = torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))
