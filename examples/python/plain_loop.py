"""A plain training loop that commits every 100 steps from memory, and a
restart from step 500 on a new branch. `pip install ckptvc torch`."""
import torch, ckptvc

model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
repo = ckptvc.Repo.init("run.ckptvc", policy="balanced")
for step in range(1, 1001):
    x = torch.randn(64, 256); loss = model(x).pow(2).mean()
    loss.backward(); opt.step(); opt.zero_grad()
    if step % 100 == 0:
        repo.commit_async(step, model=model, optimizer=opt, extra={"loss": loss.item()})
repo.close()  # waits for the last commit

# Restart from step 500 on a branch of its own:
repo = ckptvc.Repo.open("run.ckptvc")
extra = repo.load("main@500", model, opt)
repo.commit(510, model=model, optimizer=opt, branch="retry-500", parent="main@500")
